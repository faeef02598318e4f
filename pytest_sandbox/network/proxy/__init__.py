"""The reference egress proxy: a pure decision, the asyncio server, the byte relay."""
