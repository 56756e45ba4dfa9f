"""One KFP component per pipeline step. Each is a lightweight Python component whose body calls
`defectvlm.cluster.steps`, so it runs the same `defectvlm <step>` command as the DVC stage; the
project's images (or, under kfp.local's SubprocessRunner, this virtual environment) provide it.
Nothing is pip-installed at run time (`install_kfp_package=False`, no packages_to_install)."""
