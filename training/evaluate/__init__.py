"""Evaluation of model folders, base vs fine-tuned side by side (`hermes-train eval`).

- `suites`: the model card's benchmark suites (tasks, shots, metrics); `tasks/` holds the card's
  BigBench task YAMLs in lm-evaluation-harness's format.
- `harness`: runs them through lm-evaluation-harness (`lm_eval.simple_evaluate`).
- `chat_suite`: the bot's own served-format loss and reply behaviour, and `chat_loss`, the
  validation loss the trainer calls.
- `tables`: Markdown tables in the card's layout and the JSON report; `cli`: the subcommand.
"""
