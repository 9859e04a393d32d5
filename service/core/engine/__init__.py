"""TreeSHAP engines behind one interface."""
