"""`mclfir tune`: hyperparameter search on Optuna over ordinary `mclfir train` runs (study.py), search spaces
(space.py) and what a study found (report.py). Sits at the top beside cli and study: it runs training as a
command and imports only the trial reporter's environment name from training."""
