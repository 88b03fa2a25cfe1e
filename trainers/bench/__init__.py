"""The trainer's benchmark, a ``python -m`` command that writes JSON (a recorded run in ``results/``):

    python -m adaptloop.trainers.bench.ray_vs_plain   # LoRA training in our Ray job against plain trl
"""
