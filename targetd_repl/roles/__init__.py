"""Role changes: the pair state machine and the orchestration of switchover/failover/failback/copy."""
