"""`python -m workloads.demo` (`make demo`): the main job end to end (`driver`) and its report folder (`report`)."""
