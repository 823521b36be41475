"""What every stage shares: the one typed configuration, the error hierarchy, and the plan.
The plan (the decision's result) sits here because training, tracking and reports read it.
"""
