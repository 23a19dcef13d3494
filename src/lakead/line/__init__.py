"""On the inspection line (issue 29): learning from the operator without a refit, model versions.

- :mod:`.update`: ``add_normals(det, images)``, the images' tokens join the gallery (or bank)
  and the leave-one-out scores and decision levels are recomputed, incrementally where exact;
  :mod:`.lake_update` (LAKE) and :mod:`.bank_update` (PatchCore, AnomalyDINO) do the work.
- :mod:`.versions`: every update writes a new version of the model directory (never in place),
  ``history`` and ``rollback``.

docs/LINE.md says what is exact and what is not, method by method.
"""
