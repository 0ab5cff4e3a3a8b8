"""The parallel engine: DeepSpeed's JSON checked, the pipeline and no-pipeline engines built,
the host tuned and the processes of a run connected."""
