"""Example parts for powergrad-train, one file each."""
