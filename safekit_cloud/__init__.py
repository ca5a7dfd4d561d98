"""safekit-cloud: high availability for any application on two or more Linux VMs."""

__version__ = "0.1.0"
