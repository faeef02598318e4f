"""inference.local: the route table, the interception CA, the interceptor, the fake backend."""
