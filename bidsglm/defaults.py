"""Defaults the command line needs, in a module that imports nothing heavy, so
``bidsglm --version`` and ``--help`` start without loading numpy and pandas."""

DEFAULT_CONFOUNDS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
