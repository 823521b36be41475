"""How far the images sit from the backbone's source domain: BatchNorm-statistics scores,
stored domain profiles (MMD, Fréchet), and graded corruptions that calibrate them.
"""
