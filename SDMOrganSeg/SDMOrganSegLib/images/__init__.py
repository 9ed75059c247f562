"""Image files and what is drawn from them: reading NIfTI/NRRD/MetaImage files and DICOM series
(``imageio``), writing them fast (``imagewriting``), SDM iso-contours as VTK polydata (``contours``) and
pictures of a case (``pictures``).

May import: ``SDMOrganSegLib.common``. Never the method, the engines or anything of Slicer.
"""
