"""The ``mlflow-rollout`` command: the top of the house.

It sits above ``flows/`` (which it runs) and never below it, so the ground
package ``mlflow_rollout`` imports nothing upward. See :mod:`cli.main`.
"""
