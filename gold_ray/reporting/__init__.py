"""What a run shows: MLflow tracking, progress lines, the HTML report and its plots."""
