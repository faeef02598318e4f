"""The conformance suite. Installed as ``pytest_sandbox.conformance`` so it runs from a wheel:
``pytest --sandbox --pyargs pytest_sandbox.conformance`` (or ``pytest-sandbox conformance``)."""
