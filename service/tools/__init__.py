"""Model tooling: training the demo models, writing a model directory (`shapstream model`)."""
