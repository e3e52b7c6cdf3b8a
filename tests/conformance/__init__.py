"""replicate's conformance corpus: public Keras examples, one device against towers."""
