"""How a model is judged: answers to probes (ROUGE-L and fact recall), perplexity, membership inference, the guard's
leakage AUROC, and the pass criteria.

- ``evaluate``: ``evaluate_model`` on ``EvalInputs``, the figures of one model;
- ``probes``: the model's answers to probes and their scores, the never-seen stand-ins;
- ``metrics``: pure functions over answers and scores (ROUGE-L, fact recall, AUROC, the criteria);
- ``target``: `atu eval` on a model id, path or export.
"""
