"""The test suite: a package, so that test files import their shared code as ``tests.helpers`` and
``tests.reference``."""
