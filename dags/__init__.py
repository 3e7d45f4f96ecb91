"""certsync's DAG files (shipped inside the package: point Airflow's dags_folder here)."""
