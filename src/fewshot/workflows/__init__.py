"""Orchestration, the top floor: workflows that chain the stages below for a user.

`pipeline` (the main job: prepare -> train -> evaluate -> export -> service check -> photos ->
distil), `tune` (Optuna search over a config), `zoo` (publish and re-score zoo entries) and
`compare` (tables and plots of finished runs). `fewshot.cli` is a thin layer over these and over
the stages' own APIs. Nothing in a stage imports from here.
"""
