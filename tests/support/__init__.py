"""Test support: the hermetic network world, test servers, image builders."""
