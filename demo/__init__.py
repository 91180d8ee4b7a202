"""The offline demo model: export of the scikit-learn digits, training recipe and evaluation."""
