"""The host agent: alone drives its host's libvirt, renews its lease, reconciles what runs."""
