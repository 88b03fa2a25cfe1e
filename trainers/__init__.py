"""Training: recipes (``sft``), the Ray wrapper (``ray_job``), holdout evaluation (``evaluate``) and
the ``adaptloop trainer`` service (``service``). Modules are imported by name, not re-exported here,
so that ``python -m adaptloop.trainers.sft`` runs its module once and importing the package stays light.
"""
