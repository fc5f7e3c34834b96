"""The tools around the library: benchmarks, evaluations, training, data, the CLI.

Nothing in the library (``crossget`` outside ``crossget.tools``) imports from here."""
