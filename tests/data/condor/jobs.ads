ClusterId = 12
ProcId = 0
GlobalJobId = "schedd.example#12.0#1700000000"
JobStatus = 1
Owner = "cms001"
x509UserProxyVOName = "cms"

ClusterId = 12
ProcId = 1
GlobalJobId = "schedd.example#12.1#1700000000"
JobStatus = 1
Owner = "cms001"

ClusterId = 13
ProcId = 0
GlobalJobId = "schedd.example#13.0#1700000001"
JobStatus = 2
Owner = "atlas001"
x509UserProxyVOName = "atlas"
MaxWallTimeMins = 120

ClusterId = 14
ProcId = 0
GlobalJobId = "schedd.example#14.0#1700000002"
JobStatus = 1
Owner = "lhcb001"
x509UserProxyVOName = "lhcb"

ClusterId = 15
ProcId = 0
GlobalJobId = "schedd.example#15.0#1700000003"
JobStatus = 1
Owner = "cms001"
x509UserProxyVOName = "cms; rm -rf /"

ClusterId = 16
ProcId = 0
GlobalJobId = "schedd.example#16.0#1700000004"
JobStatus = 1
Owner = "<script>"

ClusterId = "sixteen"
ProcId = 0
GlobalJobId = "schedd.example#x#1"
JobStatus = 1
Owner = "cms001"

ClusterId = 17
ProcId = 0
GlobalJobId = "schedd.example#17.0#1700000005"
JobStatus = 99
Owner = "cms001"

ClusterId = 18
ProcId = 0
GlobalJobId = "schedd.example#18.0#1700000006"
JobStatus = 4
Owner = "cms001"
MaxWallTimeMins = 999999999
