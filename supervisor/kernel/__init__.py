"""What Linux says and does: the process table and tree, cgroups, PSI, network namespaces, system users, peer credentials and who is calling."""
