"""pip packaging of the ROS-free core: ``pip install .`` gives ``ovseg_ros.core`` and ``ovseg-segment``.

The ROS package itself is built by colcon from package.xml (build type ament_cmake) and CMakeLists.txt;
colcon does not use this file. The ROS layer (``ovseg_ros.ros``) needs the generated interfaces, so it is
left out here.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


setup(
    name="ovseg_ros",
    version="0.1.0",
    description="Open-vocabulary semantic/panoptic segmentation with frozen CLIP (ROS-free core of ovseg_ros)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ovseg_ros", "ovseg_ros.core", "ovseg_ros.core.*", "ovseg_ros.tools", "ovseg_ros.eval"]),
    package_data={
        "ovseg_ros.core": [
            "presets/**/*.yaml",
            "model_configs/*.json",
            "data/**/*",
        ],
        "ovseg_ros.core.fcclip": ["*.tsv"],
    },
    include_package_data=False,
    install_requires=_requirements(),
    entry_points={"console_scripts": [
        "ovseg-segment = ovseg_ros.cli:main",
        "ovseg-nav2-params = ovseg_ros.tools.nav2_params:main",
        "ovseg-eval = ovseg_ros.eval.cli:main",
        "ovseg-export = ovseg_ros.tools.export_onnx:main",
        "ovseg-bag = ovseg_ros.tools.bag:main",
    ]},
)
