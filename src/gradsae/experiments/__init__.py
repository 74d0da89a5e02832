"""The paper's experiments: tasks -> rank -> perturb / steer -> stats -> run -> report.

Import the step you need (``gradsae.experiments.run``, ``.report``, ...); this
package module itself imports nothing heavy.
"""
