"""What more than one stage needs. Import submodules directly: this package imports nothing, so
`stages.train` can use the model and flow code without ever loading encoder code."""
