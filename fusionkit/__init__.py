"""fusionkit."""
