"""High availability: monitors, host failure detection, fencing and failover of service VMs."""
