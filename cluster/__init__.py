"""raylm core: everything the jobs, sweeps and Serve app import."""
