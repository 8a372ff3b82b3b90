"""What the service tells its operators: JSON log lines (`logs`) and Prometheus metrics
(`metrics`)."""
