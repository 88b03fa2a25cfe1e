"""Training: recipes (``sft``, ``kto``, ``dpo`` with helpers in ``common``), dataset snapshots and the
method choice (``snapshot``), the Ray wrapper (``ray_job``), holdout evaluation (``evaluate``), the gate
(``gate``), vLLM release checks (``release``), the ``adaptloop trainer`` service (``service``) with its
train-and-gate step (``train_and_gate``) and release records (``release_record``), the fair request queue
(``queue``) and the throughput benchmark (``bench``). Modules are imported by name, not re-exported here, so that
``python -m adaptloop.trainers.sft`` runs its module once and importing the package stays light.
"""
