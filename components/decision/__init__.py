"""Choosing the case, cut and resolution: the size x similarity rule, the probe, the budgeted
verification of the runner-up, cost estimates, and the decision report.
"""
