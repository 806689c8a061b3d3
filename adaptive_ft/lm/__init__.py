"""The model layer every stage shares: resolving and loading models (:mod:`.models`), what the model sees
(:mod:`.tokens`), its answers (:mod:`.answers`) and the loop's deployed model answering users (:mod:`.responder`).
It imports the bottom floor and :mod:`adaptive_ft.artifacts` only."""
