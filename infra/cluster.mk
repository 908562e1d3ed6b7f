# The kind/Kubernetes targets. Included from the Makefile (`include infra/cluster.mk`); also usable
# alone: `make -f infra/cluster.mk cluster-dry-run`. The work is in infra/kind/*.sh; see infra/README.md.
#
#   make up                      kind cluster + KubeRay + KFP 2.17 + the platform chart (idempotent)
#   make run [RUN_ARGS=...]      a training pipeline run on KFP in the cluster
#   make scenario NAME=...       one rollback scenario against the cluster platform
#   make status                  nodes, releases, pods, and whether each UI answers
#   make down                    delete the cluster
#   make cluster-dry-run         every script above with DRY_RUN=1: the commands, none run

CLUSTER_SCRIPTS := infra/kind
RUN_ARGS ?=
SCENARIO_ARGS ?=

# `run` and `scenario` use the project CLI from the virtualenv: when this file is included from the
# Makefile (after STAMP is defined), they depend on its set-up; alone, the scripts look for `mlops`.
CLUSTER_CLI_PREREQ := $(if $(STAMP),$(STAMP),)

.PHONY: up down run scenario status cluster-dry-run

up:
	bash $(CLUSTER_SCRIPTS)/up.sh

down:
	bash $(CLUSTER_SCRIPTS)/down.sh

run: $(CLUSTER_CLI_PREREQ)
	bash $(CLUSTER_SCRIPTS)/run.sh $(RUN_ARGS)

scenario: $(CLUSTER_CLI_PREREQ)
	@if [ -z "$(NAME)" ]; then \
		echo "usage: make scenario NAME=<scenario>   e.g. make scenario NAME=worse-quality (the files in scenarios/)" >&2; \
		exit 2; \
	fi
	bash $(CLUSTER_SCRIPTS)/scenario.sh "$(NAME)" $(SCENARIO_ARGS)

status:
	bash $(CLUSTER_SCRIPTS)/status.sh

cluster-dry-run:
	@for script in up run status down; do \
		echo "### DRY_RUN=1 $(CLUSTER_SCRIPTS)/$$script.sh"; \
		DRY_RUN=1 bash $(CLUSTER_SCRIPTS)/$$script.sh || exit $$?; \
	done
	@echo "### DRY_RUN=1 $(CLUSTER_SCRIPTS)/scenario.sh $(or $(NAME),worse-quality)"
	@DRY_RUN=1 bash $(CLUSTER_SCRIPTS)/scenario.sh "$(or $(NAME),worse-quality)"
