"""The drift monitor: Evidently windows over the prediction log against the champion's training reference."""
