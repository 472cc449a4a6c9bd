from aapo_ray.cli import run

run()
