"""The files stages exchange, as their readers see them: ``plan.json`` (:mod:`.plan`), a train run's folder
(:mod:`.run`) and ``eval.json`` (:mod:`.eval`). Shapes in docs/contracts.md. Imports the bottom floor only."""
