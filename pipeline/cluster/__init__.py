"""Ray orchestration: placement groups, the actor group (one Ray actor per Megatron rank), rollout."""
