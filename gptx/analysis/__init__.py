"""Tools that study a model or the engine (reports, plans, benchmarks, comparisons); the core never imports them."""
