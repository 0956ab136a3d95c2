"""Workers and an in-process communicator for the synchronized-BN tests.

The folder is not named ``distributed``: on pytest's sys.path that name would shadow the
``distributed`` package of dask.
"""
