"""The ceiling for the serving benchmark: the same model behind a bare Starlette route, no BentoML.

MLOPS_BENCH_MODEL_DIR=... python -m uvicorn benchmarks.bare_app:app --port P
"""

from __future__ import annotations

import json
import os

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.model import FraudScorer

torch.set_num_threads(1)
scorer = FraudScorer.load(os.environ["MLOPS_BENCH_MODEL_DIR"])


async def predict(request: Request) -> Response:
    row = json.loads(await request.body())
    score = float(scorer.score_records([row])[0])
    return Response(json.dumps({"score": score}), media_type="application/json")


app = Starlette(routes=[Route("/v1/predict", predict, methods=["POST"])])
