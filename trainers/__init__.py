"""Training: recipes (``sft``, ``kto``, ``dpo`` with helpers in ``common``), dataset snapshots and the
method choice (``snapshot``), the Ray wrapper (``ray_job``), holdout evaluation (``evaluate``), the gate
(``gate``), vLLM release checks (``release``), the ``adaptloop trainer`` service (``service``) and the
throughput benchmark (``bench``). Modules are imported by name, not re-exported here, so that
``python -m adaptloop.trainers.sft`` runs its module once and importing the package stays light.
"""
