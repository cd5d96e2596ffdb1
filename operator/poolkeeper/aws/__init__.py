"""AWS clients (aiobotocore, the optional `aws` extra), imported lazily: an operator without the
extra runs every other kind of pool and reports AWS ones as AWSSupportNotInstalled."""
