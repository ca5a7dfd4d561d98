"""Virtual IP providers: the contract (base.py), the registry, and one subpackage per network."""
