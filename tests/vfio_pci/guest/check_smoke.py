def test_imports():
    import vfio_mediate
    assert vfio_mediate.VfioPciDevice
