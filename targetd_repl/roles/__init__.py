"""Role changes: the pair state machine and the orchestration of role-change commands."""
